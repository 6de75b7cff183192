"""Request management APIs: InferenceObjective (priority) and InferenceModelRewrite."""
