"""One module per provider; each is re-exported from :mod:`gpujobs`."""
