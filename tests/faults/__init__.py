"""Two-host fault tests: network namespaces, nftables drops, tbf (issue 9)."""
