"""Data: the Tokenizer and PromptSource protocols and their implementations (the character
tokenizer, the tiny domains), the data cursor, and the Trajectories batch type."""
