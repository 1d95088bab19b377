"""Put the critical layers to work: name blocks (layer specs), fine-tune only them, freeze them against a backdoor,
and export them to the tools people fine-tune with."""
