"""Preference pairs from the teachers labels and the students samples (the data of DPO and KTO)."""
