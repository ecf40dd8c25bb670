"""Standalone data tools: webdataset converters, synthetic OCR generator, shard inspection (see README.md)."""
