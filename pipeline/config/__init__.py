"""The recipe's sections, one module per stage; ``pipeline.recipe`` assembles them into one schema."""
