"""What a device's upload reveals to the server, measured (``fedshare privacy-audit``)."""
