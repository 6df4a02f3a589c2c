"""clustermask: CLIP pretraining whose image tower drops clusters of similar patches."""
