"""The offline tools: `ft plan` (memory per rank before launch, plan.py), `ft plot` (a run's curves, plot.py) and
`ft generate` (answers from a trained model, generate.py)."""
