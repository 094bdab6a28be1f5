"""Is dynamo tracing this code, or is torch compiling or exporting?

The hot sites spell it out as ``_tracing() or _flags._is_compiling_flag``:
``torch.compiler.is_compiling()`` is two Python calls (it asks ``torch.jit.is_scripting()``
first), about 1,000 instructions at every hook call, against 420 for this test
(callgrind). ``is_dynamo_compiling()`` is one call, which dynamo evaluates to a constant
True at trace time, with no guard, so the flag after the ``or`` is never read (or guarded
on) inside a traced graph; outside tracing the flag is what ``is_compiling()`` returns,
True while torch compiles or exports.
"""

import types

import torch

if hasattr(torch.compiler, "is_dynamo_compiling") and hasattr(torch.compiler, "_is_compiling_flag"):
    _tracing, _flags = torch.compiler.is_dynamo_compiling, torch.compiler
else:  # older torch: the public function alone
    _tracing, _flags = torch.compiler.is_compiling, types.SimpleNamespace(_is_compiling_flag=False)

#: Is torch.jit.trace running the model? (Its forwards are not the user's evaluation.)
jit_tracing = getattr(torch._C, "_is_tracing", None) or torch.jit.is_tracing

__all__ = ["_tracing", "_flags", "jit_tracing"]
