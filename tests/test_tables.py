"""The one markdown table writer (cpl_fast.tables) and the tables built on it."""
from __future__ import annotations

from cpl_fast.metrics.protocols import get_protocol


def test_scores_table_markdown_and_text_are_unchanged_on_the_shared_table_writer():
    # The outputs as the hand-built table wrote them, before scores_table used cpl_fast.tables.
    from cpl_fast.eval.scoring import scores_table

    scores = {"denoise_15": {"images": 3, "psnr": 33.91234, "ssim": 0.92345678, "levels": []},
              "derain": {"images": 12, "psnr": 38.1, "ssim": 0.98, "levels": []}}
    protocol = get_protocol("promptir")
    assert scores_table(scores, protocol, markdown=True) == (
        "| task | images | PSNR (dB) | SSIM | protocol |\n|---|---|---|---|---|\n"
        "| denoise_15 | 3 | 33.91 | 0.9235 | promptir (RGB, crop 16) |\n"
        "| derain | 12 | 38.10 | 0.9800 | promptir (RGB, crop 16) |\n"
        "| average | 15 | 36.01 | 0.9517 | promptir (RGB, crop 16) |")
    assert scores_table(scores, protocol) == (
        "task        images  PSNR (dB)    SSIM  protocol\n"
        "----------  ------  ---------  ------  -----------------------\n"
        "denoise_15       3      33.91  0.9235  promptir (RGB, crop 16)\n"
        "derain          12      38.10  0.9800  promptir (RGB, crop 16)\n"
        "average         15      36.01  0.9517  promptir (RGB, crop 16)")


def test_markdown_table_is_importable_from_the_commands_and_from_layer_0():
    from cpl_fast.cli.common import markdown_table as from_cli
    from cpl_fast.tables import markdown_table

    assert from_cli is markdown_table
    assert markdown_table(["a", "b"], [[1, "x"]]) == "| a | b |\n|---|---|\n| 1 | x |"


def test_report_tables_are_unchanged_on_the_shared_table_writer():
    # As the hand-built report tables wrote them; a task without a 'before' shows nan.
    from cpl_fast.train.report import RunResult, _markdown

    def level(selection, softmax):
        return {"selection_entropy": selection, "mean_softmax_entropy": softmax}

    after = {"noise": {"images": 3, "psnr": 25.123, "ssim": 0.81234,
                       "levels": [level(1.2, 0.5), level(0.3, 0.2)]},
             "rain": {"images": 2, "psnr": 27.5, "ssim": 0.9, "levels": [level(0.1, 0.05), level(0.0, 0.0)]}}
    before = {"noise": {"images": 3, "psnr": 20.0, "ssim": 0.7, "levels": [level(1.0, 0.4), level(0.2, 0.1)]}}
    history = [{"step": 1, "loss": 0.2, "l1": 0.2, "seconds": 1.0},
               {"step": 2, "loss": 0.1, "l1": 0.1, "seconds": 1.0}]
    run = RunResult(name="a", model="tiny", k=1, objective="loop", steps=2, wall_s=2, history=history,
                    before=before, after=after)
    lines = [line for line in _markdown([run], "t", ["n"]).splitlines() if line.startswith("|")]
    assert "\n".join(lines) == (
        "| task | images | PSNR before | PSNR after | SSIM before | SSIM after |\n|---|---|---|---|---|---|\n"
        "| noise | 3 | 20.00 | 25.12 | 0.7000 | 0.8123 |\n| rain | 2 | nan | 27.50 | nan | 0.9000 |\n"
        "| task | level | selection entropy before | after | mean softmax entropy before | after |\n"
        "|---|---|---|---|---|---|\n"
        "| noise | 0 | 1.000 | 1.200 | 0.400 | 0.500 |\n| noise | 1 | 0.200 | 0.300 | 0.100 | 0.200 |\n"
        "| rain | 0 | nan | 0.100 | nan | 0.050 |\n| rain | 1 | nan | 0.000 | nan | 0.000 |")
