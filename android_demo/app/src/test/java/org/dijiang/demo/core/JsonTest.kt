package org.dijiang.demo.core

import org.junit.Assert.assertEquals
import org.junit.Assert.assertNull
import org.junit.Assert.fail
import org.junit.Test

class JsonTest {
    @Test
    fun parsesNestedValues() {
        val v = Json.parse(" {\"a\": [1, -2.5, true, false, null], \"b\": {\"c\": \"d\"}, \"e\": 1e3} ")
        assertEquals(listOf(1L, -2.5, true, false, null), v.field("a"))
        assertEquals("d", v.field("b").field("c"))
        assertEquals(1000.0, v.field("e"))
        assertEquals(1000L, v.field("e").asLong())
    }

    @Test
    fun decodesStringEscapes() {
        assertEquals("<|im_end|>\n\t\"\\/é", Json.parse("\"<|im_end|>\\n\\t\\\"\\\\\\/\\u00e9\""))
        assertEquals("\u0120hello", Json.parse("\"\\u0120hello\"")) // GPT-2 byte-level space
    }

    @Test
    fun keepsKeyOrder() {
        val m = Json.parse("{\"z\":1,\"a\":2,\"m\":3}") as Map<*, *>
        assertEquals(listOf("z", "a", "m"), m.keys.toList())
    }

    @Test
    fun emptyContainers() {
        assertEquals(emptyMap<String, Any?>(), Json.parse("{}"))
        assertEquals(emptyList<Any?>(), Json.parse("[ ]"))
    }

    @Test
    fun rejectsMalformedText() {
        for (bad in listOf("{", "[1,", "{\"a\" 1}", "\"open", "tru", "1 2", "{\"a\":1,}", "-", "\"\\x\"")) {
            try {
                Json.parse(bad)
                fail("accepted malformed JSON: $bad")
            } catch (e: IllegalArgumentException) {
                // expected
            }
        }
    }

    @Test
    fun accessorsToleratesWrongTypes() {
        assertNull(Json.parse("[1]").field("a"))
        assertNull("text".asLong())
        assertNull(Json.parse("2.5").asLong())
        assertEquals(2.0, Json.parse("2").asDouble())
    }
}
