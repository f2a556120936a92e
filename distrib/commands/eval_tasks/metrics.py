"""Per-document results of the ``distrib_instruct_response`` task (copied beside its YAML, which names it).

A response's log-likelihood is a sum over its tokens, so a mean over documents of ``exp(-ll)`` would
overflow and weigh long responses most; lm-eval's ``byte_perplexity`` and ``bits_per_byte``
aggregations instead take ``(loglikelihood, bytes)`` pairs and divide the summed log-likelihood by
the summed bytes, as its rolling perplexity tasks do.
"""


def response_per_byte(doc, results):
    loglikelihood, _is_greedy = results[0]
    size = len(doc["response"].encode("utf-8"))
    return {"byte_perplexity": (loglikelihood, size), "bits_per_byte": (loglikelihood, size)}
