"""Shard sets: one builder (builder.py) with two sources, image folders converted to WebDataset tars (convert.py)
and tars another tool wrote, indexed where they are (adopt.py); verify.py checks a set, demo.py makes demo data."""
