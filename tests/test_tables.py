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
