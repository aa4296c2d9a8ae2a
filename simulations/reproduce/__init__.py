"""fedshare reproduce: every table and figure of the papers in one command."""
