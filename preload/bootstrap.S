/*
 * preload/bootstrap.S — embeds preload/bootstrap.py, preload/glue.py and preload/auxfree.py in the
 * stage-2 object as NUL-terminated strings. Source, not bytecode: marshalled code is specific to one Python version.
 * mp_bootstrap_src .. mp_bootstrap_end is the text; the NUL after it is for Py_CompileString.
 * The glue is compiled only when a process executes its first modeling_* module; auxfree.py only
 * by the glue, and only when MOEPATCH_AUXFREE or MOEPATCH_TELEMETRY is set.
 */
    .section .rodata
    .globl mp_bootstrap_src
    .hidden mp_bootstrap_src
    .type mp_bootstrap_src, @object
mp_bootstrap_src:
    .incbin "bootstrap.py"
    .globl mp_bootstrap_end
    .hidden mp_bootstrap_end
    .type mp_bootstrap_end, @object
mp_bootstrap_end:
    .byte 0
    .size mp_bootstrap_src, . - mp_bootstrap_src

    .globl mp_glue_src
    .hidden mp_glue_src
    .type mp_glue_src, @object
mp_glue_src:
    .incbin "glue.py"
    .byte 0
    .size mp_glue_src, . - mp_glue_src

    .globl mp_auxfree_src
    .hidden mp_auxfree_src
    .type mp_auxfree_src, @object
mp_auxfree_src:
    .incbin "auxfree.py"
    .byte 0
    .size mp_auxfree_src, . - mp_auxfree_src

    .section .note.GNU-stack, "", @progbits
