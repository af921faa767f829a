"""What every hosted-provider adapter (fal.ai, Replicate, OpenAI-compatible servers, a hosted
Hypereal account) shares, so each adapter module only describes its provider's protocol:

- :mod:`.options`: the common backend options, parsed one way.
- :mod:`.http`: one long-lived pooled aiohttp client per backend behind the SSRF guard, one
  retry policy, one mapping of upstream failures to :class:`~hypereal.backends.base.BackendError`,
  output downloads through the same guard.
- :mod:`.jobs`: one submit -> poll -> fetch driver with one timeout and upstream-cancel policy,
  and progress reporting.
- :mod:`.media`: data URIs and content sniffing.
- :mod:`.chat`: the OpenAI ``chat.completion.chunk`` stream both chat-capable adapters read.
"""
