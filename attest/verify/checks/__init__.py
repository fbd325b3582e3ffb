"""The verifier's checks, one small function each returning findings, grouped by subject: `chain`
(statements, signatures, sequence, links, order, timestamps), `files` (subject digests, weights
digests, OMS signatures, the run config), `model` (genesis, trajectory, release, replay) and `data`
(lineage and licences)."""
