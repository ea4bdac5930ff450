"""Integrations with libraries whose modules need to know about offloaded weights. Nothing
outside this package imports them."""
