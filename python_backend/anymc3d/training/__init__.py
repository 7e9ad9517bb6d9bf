"""Training task plugins (the paper's appendix A3, D, H): LoRA per view on the frozen backbone, task query
pooling and a linear head, trained with focal loss, calibrated on validation, saved as a plugin.

One module per job: ``config`` (settings), ``distributed`` (torchrun processes), ``standardize`` (the head
trained on standardised embeddings), ``batching`` (padding cases into batches), ``checkpoints`` (resumable
state), ``trainer`` (the loop and the entry point), ``evaluate`` (``anymc3d eval``), ``command`` (the
``train`` and ``eval`` subcommands). This ``__init__`` imports nothing, so each module is imported by name.
"""
