"""The frame pipeline: sources, preprocessing, pacing, postprocessing, sinks, the model slot."""
