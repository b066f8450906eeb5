"""The attack lab: a curious P2, measured.

Each attack is a pure function of what P2 holds (θ′, the requests and responses it records)
plus the public knowledge its scenario grants (the public base model, public language
statistics). `attack_lab.report.run_audit` runs them all on the demo's deployments and
`stip audit` prints the table; SECURITY.md quotes it.

Modules: `scenario` (offline deployments), `embedding` (attacks 1 and 3), `linking` (2),
`cipher` and `corpus` (4), `weights` (5), `report` (6, the knobs, the table), `cli`.
"""
