"""Evaluation suite: OCR metrics, reports, compression study, markdown output, tesseract baseline, plots."""
