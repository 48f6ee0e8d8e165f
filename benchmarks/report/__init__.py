"""The report: Markdown tables (results.md, failures.md, abuse.md), raw numbers as JSON
(results.json, failures.json), the PNG plot (results.png), and the machine and commit
each report names."""
