"""Heavy helpers of the evaluators (torch, lm_eval): imported only inside the methods
that use them, never by ``import evaluators`` or by evaluator discovery."""
