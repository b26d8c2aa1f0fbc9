"""The models a run trains: policy and reference, chunked log-probs, segment-wise attention."""
