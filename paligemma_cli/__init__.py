"""paligemma: run, fine-tune and evaluate PaliGemma vision-language models locally."""

__version__ = "0.1.0"
