"""gemini-vision-pipeline: folders of images -> Parquet datasets via Gemini's image understanding."""

__version__ = "0.1.0"
