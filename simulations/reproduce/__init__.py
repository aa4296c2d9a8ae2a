"""``fedshare reproduce``: every table and figure of the papers in one command (issue 19).

Modules, in the order a run uses them:

- :mod:`.plan`: the experiment design, which cells each target needs (the protocol).
- :mod:`.cells`: cells kept on disk, run on a small pool in critical-path order; resume.
- :mod:`.work`, :mod:`.cau_work`: what one cell computes (in a worker process).
- :mod:`.tables`: the cells' results as tidy CSVs; :mod:`.readout` reads them back.
- :mod:`.figures`: the PNGs; :mod:`.report`, :mod:`.report_cau`, :mod:`.markdown`: report.md.
- :mod:`.paper`: the papers' numbers, typed once in ``simulations/paper_numbers.toml``;
  :mod:`.claims`: one check per claim of the papers.
- :mod:`.run`: the command itself (folder, sittings, outputs).
"""
