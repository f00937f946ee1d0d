"""The accuracy evaluations behind docs/accuracy.md, importable by the entry points ``launch/eval_niah.py`` and
``launch/eval_videoqa.py`` and by the tests:

``methods``  the engines of each attention method over one copy of the weights, one answer each, the comparison
             with dense (same tokens, first-token KL), the options the two evaluations share
``niah``     needle-in-a-haystack cases on SmolLM2-135M-Instruct and their run
``videoqa``  the synthetic video tasks of ``spava_ds.tasks`` on a trained checkpoint and their run
``report``   tables and plots of the records (JSON lines, plain or ``.jsonl.gz``; ``spava_ds.benchmarks.records``)
"""
