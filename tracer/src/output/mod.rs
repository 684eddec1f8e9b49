//! Subscribers to the pipeline's facts: the outputs.
