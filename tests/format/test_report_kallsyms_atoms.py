"""Print fmts that name kernel variables (mm_page_alloc's ``vmemmap_base``): with
kallsyms in the file, trace-cmd adds the symbol's address; so must we. The guest demo
found this: the agent sends kallsyms. This host's kernel has no such symbol, so the
end-to-end check is the full-text comparison on a real guest in tests/e2e/test_e2e_record.py.
"""
from __future__ import annotations

from vmtrace.format.printfmt import compile_print_fmt


class _Field:
    def __init__(self, name: str, offset: int, size: int):
        self.name, self.type, self.offset, self.size, self.signed = name, "unsigned long", offset, size, False
        self.is_array = self.is_dynamic = self.is_rel = self.is_string = self.is_pointer = False
        self.array_len = 0


def test_unknown_identifier_resolves_through_the_symbol_table():
    fmt = ('"page=%p pfn=0x%lx", REC->pfn != -1UL ? (((struct page *)vmemmap_base) + (REC->pfn))'
           ' : ((void *)0), REC->pfn')
    fields = [_Field("pfn", 8, 8)]
    with_syms = compile_print_fmt(fmt, fields, atoms={"vmemmap_base": 0xffffffff81000000}.get)
    without = compile_print_fmt(fmt, fields)
    assert with_syms.render({"pfn": 0x10}) == "page=0xffffffff81000010 pfn=0x10"
    assert without.render({"pfn": 0x10}) == "page=0x10 pfn=0x10"
