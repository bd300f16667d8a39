"""allinone: continual multitask training for all-in-one image restoration."""
