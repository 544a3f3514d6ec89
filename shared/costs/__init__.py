"""Time and money: what a fine-tune and its endpoint will cost before anything is spent, and what
they cost once done."""
