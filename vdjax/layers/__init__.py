"""Building blocks of the UNets: attention, embeddings, ResNet blocks, spatial and temporal transformers."""
