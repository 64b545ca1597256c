"""Tests of cpl_fast.data: image I/O, dataset layouts, the embedded set, torch datasets and sampler, CLI."""
from __future__ import annotations

import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cpl_fast.cli.data import main as cli_main
from cpl_fast.data import (
    EMBEDDED_TASKS,
    TASK_IDS,
    ArrayPairs,
    EvalDataset,
    FilePairs,
    ImageReadError,
    LayoutError,
    Sample,
    TaskBalancedSampler,
    TrainDataset,
    atomic_write_bytes,
    augment,
    build_task_ids,
    crop_to_multiple,
    embedded_pairs,
    load_layout,
    materialize,
    read_image,
    read_image_array,
    task_family,
    to_uint8,
    verify_layout,
    worker_init_fn,
    write_png,
)
from cpl_fast.data.layouts import CDD11_DEGRADED


def _rand_u8(seed: int, h: int = 8, w: int = 10) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


_counter = iter(range(10 ** 6))


def _img(path: Path, h: int = 8, w: int = 10) -> Path:
    """Write a tiny random image (format from the extension)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_rand_u8(next(_counter), h, w)).save(path)
    return path


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ---------------------------------------------------------------------------------------------- io

def test_png_round_trip_exact_for_arrays_and_tensors(tmp_path):
    u8 = _rand_u8(1, 9, 13)
    write_png(tmp_path / "a.png", u8.astype(np.float64) / 255)
    back = read_image_array(tmp_path / "a.png")
    assert back.dtype == np.float32 and back.shape == (9, 13, 3)
    np.testing.assert_array_equal(np.round(back * 255).astype(np.uint8), u8)
    t = torch.from_numpy(u8.transpose(2, 0, 1).astype(np.float32) / 255)
    write_png(tmp_path / "sub" / "b.png", t)
    tb = read_image(tmp_path / "sub" / "b.png")
    assert tb.shape == (3, 9, 13) and tb.dtype == torch.float32
    torch.testing.assert_close(tb, t, rtol=0, atol=1e-7)


def test_to_uint8_rounds_and_clips():
    x = np.array([[[-0.2, 0.2, 1.3]]])
    np.testing.assert_array_equal(to_uint8(x), [[[0, 51, 255]]])
    assert to_uint8(torch.full((1, 2, 2), 0.5)).shape == (2, 2)
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(np.full((2, 2, 3), np.nan))
    with pytest.raises(TypeError):
        to_uint8([[0.1]])
    with pytest.raises(ValueError, match="shape"):
        to_uint8(np.zeros((2, 2, 4)))


def test_greyscale_alpha_palette_and_16bit(tmp_path):
    grey = np.random.default_rng(2).integers(0, 256, (6, 7), dtype=np.uint8)
    Image.fromarray(grey, mode="L").save(tmp_path / "g.png")
    g = read_image_array(tmp_path / "g.png")
    np.testing.assert_array_equal(g, np.repeat(grey[:, :, None] / np.float32(255), 3, axis=2))
    rgba = np.dstack([_rand_u8(3, 6, 7), np.full((6, 7), 128, np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    with pytest.warns(UserWarning, match="alpha channel dropped"):
        a = read_image_array(tmp_path / "a.png")
    np.testing.assert_array_equal(np.round(a * 255).astype(np.uint8), rgba[:, :, :3])
    sixteen = np.random.default_rng(4).integers(0, 65536, (5, 6)).astype(np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "s.png")
    s = read_image_array(tmp_path / "s.png")
    np.testing.assert_allclose(s[:, :, 1], sixteen / 65535.0, atol=1e-7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an opaque palette image raises no warning
        Image.fromarray(_rand_u8(5, 6, 7)).convert("P").save(tmp_path / "p.png")
        assert read_image_array(tmp_path / "p.png").shape == (6, 7, 3)


def test_unreadable_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(ImageReadError, match="junk.png"):
        read_image(tmp_path / "junk.png")
    _img(tmp_path / "full.png", 64, 64)
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cut.png"):
        read_image(tmp_path / "cut.png")
    with pytest.raises(ValueError, match="PNG"):
        write_png(tmp_path / "x.jpg", np.zeros((2, 2, 3)) + 0.5)


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "d" / "f.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]  # no temporary left behind
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"


# ----------------------------------------------------------------------------------------- layouts

def _promptir_train(root: Path, lists: bool = True, airnet: bool = False) -> None:
    _img(root / "Train/Denoise/a.jpg")
    _img(root / "Train/Denoise/b.bmp")
    for n in (1, 2):
        _img(root / f"Train/Derain/rainy/rain-{n}.png")
        _img(root / f"Train/Derain/gt/norain-{n}.png")
    for ident, a, b in (("0001", "0.8", "0.2"), ("0002", "0.9", "0.1")):
        _img(root / f"Train/Dehaze/synthetic/part1/{ident}_{a}_{b}.jpg")
        _img(root / f"Train/Dehaze/original/{ident}.jpg")
    if lists:
        listname = "denoise_airnet.txt" if airnet else "denoise.txt"
        _write(root / "data_dir/noisy" / listname, "a.jpg\nb.bmp\n")
        _write(root / "data_dir/rainy/rainTrain.txt", "rainy/rain-1.png\nrainy/rain-2.png\n")
        _write(root / "data_dir/hazy/hazy_outside.txt",
               "synthetic/part1/0001_0.8_0.2.jpg\nsynthetic/part1/0002_0.9_0.1.jpg\n")


def _promptir_test(root: Path) -> None:
    _img(root / "test/denoise/bsd68/x.png")
    _img(root / "test/denoise/bsd68/y.png")
    for n in (1, 2):
        _img(root / f"test/derain/Rain100L/input/{n}.png")
        _img(root / f"test/derain/Rain100L/target/{n}.png")
    _img(root / "test/dehaze/input/0001_0.8_0.2.jpg")
    _img(root / "test/dehaze/target/0001.png")


@pytest.mark.parametrize("lists,airnet", [(True, False), (True, True), (False, False)])
def test_promptir3_train_good(tmp_path, lists, airnet):
    _promptir_train(tmp_path, lists, airnet)
    report = verify_layout("promptir3", tmp_path)
    assert report.ok, str(report)
    assert report.counts == {"denoise_15": 2, "denoise_25": 2, "denoise_50": 2, "derain": 2, "dehaze": 2}
    assert any("data_dir" in n for n in report.notes) == (not lists)
    samples = load_layout("promptir3", tmp_path)
    noisy = [s for s in samples if s.task == "denoise_25"]
    assert all(s.input is None and s.degradation == "noise_promptir" for s in noisy)
    assert all(s.params == {"sigma": 25} for s in noisy)
    hazy = next(s for s in samples if s.task == "dehaze")
    assert hazy.target.parent.name == "original" and hazy.target.suffix == ".jpg"
    rain = next(s for s in samples if s.task == "derain")
    assert rain.target.name == "norain-" + rain.input.name[len("rain-"):]


def test_file_pairs_from_layout_feed_train_and_eval(tmp_path):
    _promptir_train(tmp_path)
    _promptir_test(tmp_path)
    train = FilePairs.from_layout("promptir3", tmp_path)
    assert len(train) == 10 and Counter(train.tasks)["derain"] == 2
    ds = TrainDataset(train, patch_size=8)
    assert ds.task_ids == {"denoise_15": 0, "denoise_25": 0, "denoise_50": 0, "derain": 1, "dehaze": 2}
    assert sorted(Counter(ds.labels).values()) == [2, 2, 6]
    test = FilePairs.from_layout("promptir3", tmp_path, split="test")
    ev = EvalDataset(test)
    first = [ev[i]["input"] for i in range(len(ev))]
    assert all(torch.equal(a, ev[i]["input"]) for i, a in enumerate(first))  # fixed per-item seeds
    assert {ev[i]["subset"] for i in range(len(ev))} == {"bsd68", "Rain100L", "SOTS"}
    (tmp_path / "Train/Derain/gt/norain-1.png").unlink()
    with pytest.raises(LayoutError, match="norain-1.png"):
        FilePairs.from_layout("promptir3", tmp_path)


def test_promptir3_train_broken(tmp_path):
    _promptir_train(tmp_path)
    (tmp_path / "Train/Derain/gt/norain-2.png").unlink()
    _write(tmp_path / "data_dir/noisy/denoise.txt", "a.jpg\nb.bmp\nc.jpg\n")
    _img(tmp_path / "Train/Dehaze/synthetic/part2/badname.jpg")
    _write(tmp_path / "data_dir/hazy/hazy_outside.txt",
           "synthetic/part1/0001_0.8_0.2.jpg\nsynthetic/part2/badname.jpg\nsynthetic/part3/0009_0.8_0.1.jpg\n")
    report = verify_layout("promptir3", tmp_path)
    assert not report.ok
    text = "\n".join(report.problems)
    assert "norain-2.png" in text and "c.jpg" in text and "badname.jpg" in text and "0009_0.8_0.1.jpg" in text
    assert report.counts["derain"] == 1 and report.counts["dehaze"] == 1
    with pytest.raises(LayoutError) as err:
        load_layout("promptir3", tmp_path)
    assert err.value.report.problems == report.problems and "PROBLEMS FOUND" in str(err.value)


def test_promptir3_missing_folders_and_lists(tmp_path):
    _promptir_train(tmp_path)
    (tmp_path / "data_dir/rainy/rainTrain.txt").unlink()
    for p in sorted((tmp_path / "Train/Dehaze").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (tmp_path / "Train/Dehaze").rmdir()
    report = verify_layout("promptir3", tmp_path)
    text = "\n".join(report.problems)
    assert "rainTrain.txt" in text and "Train/Dehaze/synthetic/" in text and "Train/Dehaze/original/" in text


def test_promptir3_unlisted_orphans_are_reported_without_lists(tmp_path):
    _promptir_train(tmp_path, lists=False)
    _img(tmp_path / "Train/Derain/gt/norain-7.png")
    _img(tmp_path / "Train/Derain/rainy/drizzle.png")
    text = "\n".join(verify_layout("promptir3", tmp_path).problems)
    assert "norain-7.png" in text and "drizzle.png" in text


def test_promptir3_test_split(tmp_path):
    _promptir_test(tmp_path)
    report = verify_layout("promptir3", tmp_path, split="test")
    assert report.ok, str(report)
    assert report.counts == {"denoise_15 [bsd68]": 2, "denoise_25 [bsd68]": 2, "denoise_50 [bsd68]": 2,
                             "derain [Rain100L]": 2, "dehaze [SOTS]": 1}
    assert any("urban100" in n for n in report.notes)
    (tmp_path / "test/derain/Rain100L/target/2.png").unlink()
    _img(tmp_path / "test/dehaze/input/0005_0.9_0.2.jpg")
    _img(tmp_path / "test/dehaze/target/0007.png")
    text = "\n".join(verify_layout("promptir3", tmp_path, split="test").problems)
    assert "Rain100L/input/2.png" in text and "0005.png" in text and "0007.png" in text


def test_promptir5(tmp_path):
    _promptir_train(tmp_path)
    _promptir_test(tmp_path)
    for name in ("g1.png", "g2.png"):
        _img(tmp_path / "Train/Deblur/blur" / name)
        _img(tmp_path / "Train/Deblur/sharp" / name)
        _img(tmp_path / "test/deblur/gopro/input" / name)
        _img(tmp_path / "test/deblur/gopro/target" / name)
    _img(tmp_path / "Train/Enhance/low/l1.png")
    _img(tmp_path / "Train/Enhance/gt/l1.png")
    _img(tmp_path / "test/enhance/lol/input/l1.png")
    _img(tmp_path / "test/enhance/lol/target/l1.png")
    train = verify_layout("promptir5", tmp_path)
    assert train.ok and train.counts["deblur"] == 2 and train.counts["enhance"] == 1
    test = verify_layout("promptir5", tmp_path, split="test")
    assert test.ok and test.counts["deblur [gopro]"] == 2 and test.counts["enhance [lol]"] == 1
    _img(tmp_path / "Train/Deblur/blur/g3.png")
    _img(tmp_path / "Train/Deblur/sharp/other.png")
    text = "\n".join(verify_layout("promptir5", tmp_path).problems)
    assert "g3.png" in text and "other.png" in text


def test_allweather(tmp_path):
    for name in ("im1.png", "im2.png"):
        _img(tmp_path / "train/allweather/input" / name)
        _img(tmp_path / "train/allweather/gt" / name)
    _write(tmp_path / "train/allweather.txt", "./allweather/input/im1.png\n./allweather/input/im2.png\n")
    report = verify_layout("allweather", tmp_path)
    assert report.ok and report.counts == {"allweather [allweather]": 2}
    (tmp_path / "train/allweather.txt").unlink()
    nolist = verify_layout("allweather", tmp_path)
    assert nolist.ok and nolist.counts == {"allweather": 2} and nolist.notes
    _write(tmp_path / "train/allweather.txt",
           "./allweather/input/im1.png\n./allweather/input/im9.png\nbad.png\n")
    (tmp_path / "train/allweather/gt/im1.png").unlink()
    text = "\n".join(verify_layout("allweather", tmp_path).problems)
    assert "gt/im1.png" in text and "im9.png" in text and "bad.png" in text
    assert not verify_layout("allweather", tmp_path, split="test").ok  # no test/ folder


def _cdd11(root: Path) -> None:
    for name in ("000001.png", "000002.png"):
        _img(root / "train/clear" / name)
        for task in CDD11_DEGRADED:
            _img(root / "train" / task / name)


def test_cdd11(tmp_path):
    _cdd11(tmp_path)
    report = verify_layout("cdd11", tmp_path)
    assert report.ok and report.counts == {t: 2 for t in CDD11_DEGRADED}
    samples = load_layout("cdd11", tmp_path)
    assert all(s.target.parent.name == "clear" and s.target.name == s.input.name for s in samples)
    (tmp_path / "train/clear/000002.png").unlink()
    for p in (tmp_path / "train/low_snow").iterdir():
        p.unlink()
    (tmp_path / "train/low_snow").rmdir()
    report = verify_layout("cdd11", tmp_path)
    text = "\n".join(report.problems)
    assert "clear/000002.png" in text and "low_snow" in text and len(report.problems) == 1 + 10


def test_weatherbench(tmp_path):
    for task in ("rain", "haze", "snow"):
        _img(tmp_path / task / "input/w1.png")
        _img(tmp_path / task / "target/w1.png")
    report = verify_layout("weatherbench", tmp_path)
    assert report.ok and report.counts == {"rain": 1, "haze": 1, "snow": 1}
    _img(tmp_path / "snow/input/w2.png")
    report = verify_layout("weatherbench", tmp_path)
    assert not report.ok and "snow/input/w2.png" in report.problems[0]
    with pytest.raises(ValueError, match="no splits"):
        verify_layout("weatherbench", tmp_path, split="train")


def test_paired_flat_and_per_task(tmp_path):
    flat = tmp_path / "flat"
    _img(flat / "input/a.jpg")
    _img(flat / "target/a.png")  # stems match across extensions
    report = verify_layout("paired", flat)
    assert report.ok and report.counts == {"flat": 1}
    tasks = tmp_path / "tasks"
    for task, names in (("rain", ("r1", "r2")), ("snow", ("s1",))):
        for n in names:
            _img(tasks / "input" / task / f"{n}.png")
            _img(tasks / "target" / task / f"{n}.png")
    assert verify_layout("paired", tasks).counts == {"rain": 2, "snow": 1}
    _img(tasks / "target/rain/r3.png")
    _img(tasks / "target/fog/f1.png")
    text = "\n".join(verify_layout("paired", tasks).problems)
    assert "r3.png" in text and "target/fog/" in text
    _img(tasks / "input/loose.png")
    assert "mixes" in verify_layout("paired", tasks).problems[0]


def test_report_errors_and_truncation(tmp_path):
    root = tmp_path / "p"
    for i in range(25):
        _img(root / f"input/{i}.png")
    (root / "target").mkdir()
    report = verify_layout("paired", root)
    assert len(report.problems) == 25 and "... and 5 more" in str(report)
    assert not verify_layout("paired", tmp_path / "nowhere").ok
    (tmp_path / "empty/input").mkdir(parents=True)
    (tmp_path / "empty/target").mkdir()
    assert any("no" in p for p in verify_layout("paired", tmp_path / "empty").problems)
    with pytest.raises(ValueError, match="unknown layout"):
        verify_layout("nope", tmp_path)
    with pytest.raises(ValueError, match="splits"):
        verify_layout("cdd11", tmp_path, split="val")
    with pytest.raises(ValueError, match="exactly one"):
        Sample(target=Path("t.png"), task="x")


def test_cli_verify(tmp_path, capsys):
    _img(tmp_path / "input/a.png")
    _img(tmp_path / "target/a.png")
    assert cli_main(["verify", "--layout", "paired", str(tmp_path)]) == 0
    assert "OK" in capsys.readouterr().out
    _img(tmp_path / "input/b.png")
    assert cli_main(["verify", "--layout", "paired", str(tmp_path)]) == 1
    assert "b.png" in capsys.readouterr().out
    assert cli_main(["verify", "--layout", "paired", "--split", "test", str(tmp_path)]) == 2
    with pytest.raises(SystemExit):
        cli_main(["verify", "--layout", "bogus", str(tmp_path)])


# ------------------------------------------------------------------------------------------ embedded

@pytest.fixture(scope="module")
def embedded():
    start = time.perf_counter()
    pairs = {split: embedded_pairs(split) for split in ("train", "test")}
    return pairs, time.perf_counter() - start


def test_embedded_generation_is_fast_and_complete(embedded):
    pairs, seconds = embedded
    assert seconds < 10
    for p in pairs.values():
        counts = Counter(p.tasks)
        assert set(counts) == set(EMBEDDED_TASKS) and len(set(counts.values())) == 1
        assert all(a.shape == (160, 160, 3) and a.dtype == np.uint8 for a in p.inputs + p.targets)
        assert all(not np.array_equal(a, b) for a, b in zip(p.inputs, p.targets, strict=True))
    assert len(pairs["train"]) > 3 * len(pairs["test"])
    assert all(s.startswith("embedded_") for s in pairs["test"].subsets)


def test_embedded_train_and_test_are_disjoint_by_source(embedded):
    pairs, _ = embedded
    src = {split: {n.rsplit("_", 1)[0] for n in p.names} for split, p in pairs.items()}
    assert src["train"].isdisjoint(src["test"]) and len(src["test"]) >= 3
    train_keys = {t.tobytes() for t in pairs["train"].targets}
    assert not any(t.tobytes() in train_keys for t in pairs["test"].targets)


def test_embedded_is_deterministic_and_seeded(embedded):
    pairs, _ = embedded
    again = embedded_pairs("test")
    assert again.names == pairs["test"].names
    for a, b in zip(again.inputs, pairs["test"].inputs, strict=True):
        np.testing.assert_array_equal(a, b)
    other = embedded_pairs("test", seed=1)
    assert any(not np.array_equal(a, b) for a, b in zip(other.inputs, pairs["test"].inputs, strict=True))
    assert TASK_IDS == build_task_ids(EMBEDDED_TASKS)
    with pytest.raises(ValueError, match="split"):
        embedded_pairs("val")


def test_materialize_writes_a_paired_tree(tmp_path):
    root = materialize(tmp_path / "emb", crop_size=32, crops_per_image=1)
    for split in ("train", "test"):
        report = verify_layout("paired", root / split)
        assert report.ok and set(report.counts) == set(EMBEDDED_TASKS)
    pairs = embedded_pairs("test", crop_size=32, crops_per_image=1)
    path = root / "test/input" / pairs.tasks[3] / f"{pairs.names[3]}.png"
    np.testing.assert_array_equal(np.asarray(Image.open(path)), pairs.inputs[3])


# ------------------------------------------------------------------------------------------ datasets

def _inverted_pairs(sizes=((40, 50), (36, 44), (48, 40)),
                    tasks=("derain", "dehaze", "denoise_25")) -> ArrayPairs:
    """Targets random, inputs = 255 - target: any crop/flip mismatch between them shows up."""
    targets = [_rand_u8(10 + i, h, w) for i, (h, w) in enumerate(sizes)]
    return ArrayPairs([255 - t for t in targets], targets, list(tasks), [f"n{i}" for i in range(len(sizes))])


def test_train_dataset_crops_and_same_augmentation():
    ds = TrainDataset(_inverted_pairs(), patch_size=32, seed=3)
    modes = set()
    for epoch in range(4):
        for i in range(len(ds)):
            item = ds[(epoch, i)]
            assert item["input"].shape == item["target"].shape == (3, 32, 32)
            torch.testing.assert_close(item["input"], 1 - item["target"], rtol=0, atol=1e-6)
            assert item["task_id"] == ds.task_ids[item["task"]] and item["name"] == f"n{i}"
            # the target crop is some dihedral transform of a window of the source image
            src = ds.source.targets[i].astype(np.float32) / 255
            patch = item["target"].numpy().transpose(1, 2, 0)
            found = [m for m in range(8) for y in range(src.shape[0] - 31) for x in range(src.shape[1] - 31)
                     if np.array_equal(augment(src[y:y + 32, x:x + 32], m), patch)]
            assert found
            modes.add(found[0])
    assert len(modes) > 3


def test_train_dataset_is_reproducible_per_seed_epoch_index():
    a, b = TrainDataset(_inverted_pairs(), 24, seed=5), TrainDataset(_inverted_pairs(), 24, seed=5)
    torch.testing.assert_close(a[(2, 1)]["input"], b[(2, 1)]["input"], rtol=0, atol=0)
    assert not torch.equal(a[(2, 1)]["input"], a[(3, 1)]["input"])
    assert not torch.equal(a[(2, 1)]["input"], TrainDataset(_inverted_pairs(), 24, seed=6)[(2, 1)]["input"])
    a.set_epoch(2)
    assert torch.equal(a[1]["input"], b[(2, 1)]["input"])
    with pytest.raises(IndexError):
        a[(0, 3)]


def test_train_dataset_small_images_padded_or_refused():
    pairs = _inverted_pairs(sizes=((20, 18), (40, 40), (40, 40)))
    item = TrainDataset(pairs, 32)[0]
    assert item["input"].shape == (3, 32, 32)
    torch.testing.assert_close(item["input"], 1 - item["target"], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="n0.*smaller than the 32x32 patch"):
        TrainDataset(pairs, 32, pad_small=False)[0]


def test_synthesised_file_samples_through_the_dataset(tmp_path):
    clean = _img(tmp_path / "c.png", 40, 40)
    sample = Sample(target=clean, task="denoise_50", degradation="noise_promptir", params={"sigma": 50})
    pairs = FilePairs([sample])
    ds = TrainDataset(pairs, 16, seed=1, augment=False)
    x, y = ds[(0, 0)], ds[(0, 0)]
    assert torch.equal(x["input"], y["input"])
    levels = x["input"] * 255
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
    assert (x["input"] - x["target"]).std() > 0.1
    assert not torch.equal(ds[(1, 0)]["input"], x["input"])


def test_file_pairs_size_mismatch_names_files(tmp_path):
    s = Sample(target=_img(tmp_path / "t.png", 8, 8), input=_img(tmp_path / "i.png", 8, 9), task="derain")
    with pytest.raises(ValueError, match="i.png.*t.png"):
        FilePairs([s]).load(0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown degradation"):
        FilePairs([Sample(target=tmp_path / "t.png", task="x", degradation="fog")])


def test_eval_dataset_full_images_and_crop():
    pairs = ArrayPairs([_rand_u8(1, 40, 50)], [_rand_u8(2, 40, 50)], ["derain"], ["r"], ["Rain100L"])
    ev = EvalDataset(pairs)
    item = ev[0]
    assert item["input"].shape == (3, 40, 50) and item["subset"] == "Rain100L" and item["name"] == "r"
    cropped = EvalDataset(pairs, crop_multiple=16)[0]
    assert cropped["target"].shape == (3, 32, 48)
    # PromptIR's crop_img: offset (h % 16) // 2 = 4 rows, (w % 16) // 2 = 1 column
    torch.testing.assert_close(cropped["target"], item["target"][:, 4:36, 1:49], rtol=0, atol=0)
    with pytest.raises(ValueError, match="smaller than the crop base"):
        crop_to_multiple(np.zeros((8, 40, 3)), 16)


def test_augment_modes_are_the_eight_distinct_dihedral_maps():
    x = np.random.default_rng(0).random((5, 5, 2))
    outs = [augment(x, m) for m in range(8)]
    np.testing.assert_array_equal(outs[0], x)
    assert len({o.tobytes() for o in outs}) == 8
    with pytest.raises(ValueError, match="mode"):
        augment(x, 8)


def test_task_ids():
    assert task_family("denoise_15") == "denoise" and task_family("low_haze") == "low_haze"
    assert build_task_ids(["dehaze", "denoise_25", "derain", "denoise_15"]) == {
        "denoise_15": 0, "denoise_25": 0, "derain": 1, "dehaze": 2}
    assert build_task_ids(["snow", "derain", "haze"]) == {"derain": 0, "haze": 1, "snow": 2}
    with pytest.raises(ValueError, match="no id"):
        TrainDataset(_inverted_pairs(), 16, task_ids={"derain": 0})
    with pytest.raises(ValueError, match="equally long"):
        ArrayPairs([_rand_u8(0)], [], ["a"], ["b"])
    with pytest.raises(ValueError, match="uint8"):
        ArrayPairs([_rand_u8(0)], [_rand_u8(0).astype(np.float32)], ["a"], ["b"])


# ------------------------------------------------------------------------------------------- sampler

_LABELS = [0] * 50 + [1] * 5 + [2] * 20


def test_sampler_balances_tasks():
    s = TaskBalancedSampler(_LABELS, num_samples=90, seed=1)
    keys = list(s)
    assert len(keys) == len(s) == 90 and all(e == 0 for e, _ in keys)
    counts = Counter(_LABELS[i] for _, i in keys)
    assert counts == {0: 30, 1: 30, 2: 30}
    # the small task cycles through its items
    assert Counter(i for _, i in keys if _LABELS[i] == 1) == {i: 6 for i in range(50, 55)}
    odd = Counter(_LABELS[i] for _, i in TaskBalancedSampler(_LABELS, num_samples=91, seed=1))
    assert max(odd.values()) - min(odd.values()) == 1
    plain = [i for _, i in TaskBalancedSampler(_LABELS, seed=1, balanced=False)]
    assert sorted(plain) == list(range(75))


def test_sampler_order_depends_on_seed_and_epoch_only_and_resumes():
    a, b = TaskBalancedSampler(_LABELS, seed=4), TaskBalancedSampler(_LABELS, seed=4)
    a.set_epoch(3)
    b.set_epoch(3)
    full = list(a)
    assert full == list(b) and all(e == 3 for e, _ in full)
    b.set_epoch(4)
    assert [i for _, i in b] != [i for _, i in full]
    a.set_start(10)
    assert list(a) == full[10:] and len(a) == len(full) - 10
    state = a.state_dict()
    c = TaskBalancedSampler(_LABELS, seed=4)
    c.load_state_dict(state)
    assert list(c) == full[10:]
    with pytest.raises(ValueError, match="seed"):
        TaskBalancedSampler(_LABELS, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="start position"):
        a.set_start(10 ** 6)


def test_sampler_shards_across_ranks():
    full = TaskBalancedSampler(_LABELS, num_samples=75, seed=2).epoch_order(0)
    shards = [[i for _, i in TaskBalancedSampler(_LABELS, num_samples=75, seed=2, rank=r, world_size=2)]
              for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 38
    interleaved = [x for pair in zip(*shards, strict=True) for x in pair]
    assert interleaved[:75] == list(full) and interleaved[75] == full[0]  # padded by wrapping
    with pytest.raises(ValueError, match="rank"):
        TaskBalancedSampler(_LABELS, rank=2, world_size=2)


def _batches(loader):
    return [(b["task_id"].tolist(), b["input"]) for b in loader]


def test_dataloader_stream_is_the_same_with_workers_and_after_resume():
    pairs = _inverted_pairs(sizes=[(24, 28)] * 6, tasks=["derain", "dehaze", "denoise_15"] * 2)
    ds = TrainDataset(pairs, 16, seed=7)
    sampler = TaskBalancedSampler(ds.labels, num_samples=12, seed=7)

    def run(workers, epochs=(0, 1), start=0):
        loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=workers,
                            worker_init_fn=worker_init_fn,
                            persistent_workers=workers > 0)
        out = []
        for e in epochs:
            sampler.set_epoch(e)
            sampler.set_start(start)
            out += _batches(loader)
        return out

    serial, parallel = run(0), run(2)
    assert len(serial) == 6
    for (ta, xa), (tb, xb) in zip(serial, parallel, strict=True):
        assert ta == tb and torch.equal(xa, xb)
    assert not torch.equal(serial[0][1], serial[3][1])  # epochs differ
    resumed = run(0, epochs=(1,), start=8)
    assert len(resumed) == 1 and torch.equal(resumed[0][1], serial[5][1])
