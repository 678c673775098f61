"""Data: image sources, the official training transform, glimpse batches.

Entry points for the trainer and evaluator (see pipeline.py):

    from mambaeye_jax.data import pipeline
    it = pipeline.make_train_iterator({"source": "folder", "path": root})
    ev = pipeline.make_eval_iterator({"source": "folder", "path": val_root,
                                      "eval_canvas": 512, "num_glimpses": 4096,
                                      "scan_pattern": "random"})

Modules import nothing heavy here, so importing one does not pull the rest.
"""
