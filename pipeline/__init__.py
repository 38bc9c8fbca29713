"""gemini-vision-pipeline: folders of images -> Parquet datasets with Gemini image understanding."""

__version__ = "0.1.0"
