"""Fine-tuning from a released or trained checkpoint: LoRA (peft) or full, with replay.

config (typed schema, no torch), lora (freezing, adapters), vocab (character-vocabulary
extension), demo (new-script reading lines), export (adapter / merged release layout),
job (`run_finetune`, the single-process job behind `dsocr-finetune`).
"""
