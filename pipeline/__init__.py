"""Training, data path and composition of the DeepSeek-OCR model (DeepEncoder + MoE decoder).

Everything about running lives here: the full model built by injection from
`deepencoder` and `decoder`, data loading and packing, the DeepSpeed engines,
checkpoints, logging and evaluation.
"""
