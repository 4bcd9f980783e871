"""Text/image/video in, video out: the sampling pipelines of each family."""
