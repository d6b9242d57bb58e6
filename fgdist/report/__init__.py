"""Reports on runs: fgdist-compare (comparison, differences, bootstrap) and fgdist-pictures
(pictures: attention maps and the retrieval grid), with their shared figure helper (figures)."""
