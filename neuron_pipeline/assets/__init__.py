"""Thin Dagster assets, one module per stage; the science lives in interp/, subject/, lake/."""
