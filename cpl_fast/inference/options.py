"""The choices of ``restore_image`` that the commands' parsers offer, without importing torch."""
AMP_MODES = ("auto", "none", "bf16", "fp16")
AUTO_TILE = 512
DEFAULT_OVERLAP = 32
