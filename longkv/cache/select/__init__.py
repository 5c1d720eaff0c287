"""Methods that keep every token but read only part of it: `quest` (pages chosen per decode step) and
`duo` (retrieval heads read everything, streaming heads sink + window)."""
