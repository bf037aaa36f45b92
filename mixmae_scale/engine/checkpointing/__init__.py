"""Everything a checkpoint holds and how a run resumes, in one place.

- store.py: tag folders a crash cannot corrupt (written as `.partial`, sealed with each file's size, renamed),
  the damage check, rotation;
- state.py: what the client state, each rank's file and a non-finite stop's marker hold, as types (the only
  code that knows their keys);
- resume.py: `plan_resume()`, the resume read top to bottom: which tag (damage fallback, the non-finite
  policies), which layout (same, another world size or precision through the universal checkpoint), and
  loading it;
- universal.py: the optimizer layout and DeepSpeed's universal checkpoint (conversion, loading fix);
- checkpointer.py: `Checkpointer`, which the training loop calls; it decides when to save.
"""
