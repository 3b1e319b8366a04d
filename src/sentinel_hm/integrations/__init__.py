"""Sentinel inside training frameworks that own the loop.

- `sentinel_hm.integrations.hf.SentinelCallback`: a Hugging Face ``transformers``
  ``TrainerCallback`` (extra ``hf``).
- `sentinel_hm.integrations.lightning.SentinelCallback`: a Lightning ``Callback``
  (extra ``lightning``).

Each module imports its framework when it is imported itself; importing this package
imports neither (torch is the only core dependency). See ``docs/integrations.md``.
"""
