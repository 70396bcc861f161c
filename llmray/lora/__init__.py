"""Multi-LoRA serving: PEFT adapters loaded into device slots and applied per row of a mixed batch."""
