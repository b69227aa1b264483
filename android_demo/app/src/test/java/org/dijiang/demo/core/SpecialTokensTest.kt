package org.dijiang.demo.core

import org.junit.Assert.assertEquals
import org.junit.Assert.assertNull
import org.junit.Assert.fail
import org.junit.Test

class SpecialTokensTest {
    // The opening of SmolLM2's tokenizer.json, trimmed.
    private val tokenizerJson = """
        {"version": "1.0", "truncation": null, "padding": null,
         "added_tokens": [
          {"id": 0, "content": "<|endoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
          {"id": 1, "content": "<|im_start|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
          {"id": 2, "content": "<|im_end|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
         ],
         "model": {"type": "BPE", "vocab": {"!": 0, "\u0120the": 1}, "merges": ["\u0120 t", "h e"]}}
    """.trimIndent()

    @Test
    fun mapsEosIdsToTheirText() {
        val t = SpecialTokens.fromTokenizerJson(tokenizerJson)
        assertEquals(3, t.size)
        assertEquals("<|im_end|>", t.content(2))
        assertEquals(setOf("<|im_end|>", "<|endoftext|>"), t.contents(listOf(2L, 0L)))
        assertNull(t.content(99))
        assertEquals(setOf("<|im_end|>"), t.contents(listOf(2L, 99L)))
    }

    @Test
    fun refusesATokenizerWithoutAddedTokens() {
        try {
            SpecialTokens.fromTokenizerJson("{\"model\": {}}")
            fail("a tokenizer.json without added_tokens must be refused")
        } catch (e: IllegalArgumentException) {
            assertEquals("tokenizer.json has no added_tokens list", e.message)
        }
    }
}
