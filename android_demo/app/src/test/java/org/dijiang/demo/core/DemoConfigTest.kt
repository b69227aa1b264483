package org.dijiang.demo.core

import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Test

class DemoConfigTest {
    @Test
    fun acceptsAValidForm() {
        val p = DemoConfig.parse(" /sdcard/m.pte ", "/sdcard/tokenizer.json", "0.7", "128")
        assertEquals(DemoConfig.Parsed.Ok(DemoConfig("/sdcard/m.pte", "/sdcard/tokenizer.json", 0.7f, 128)), p)
    }

    @Test
    fun reportsEveryBadField() {
        val p = DemoConfig.parse("model.bin", "tok.model", "1.5", "0") as DemoConfig.Parsed.Invalid
        assertEquals(4, p.errors.size)
        assertTrue(p.errors[2].startsWith("temperature"))
        assertTrue(DemoConfig.parse("m.pte", "t.json", "abc", "10") is DemoConfig.Parsed.Invalid)
        assertTrue(DemoConfig.parse("m.pte", "t.json", "0", "100000") is DemoConfig.Parsed.Invalid)
    }

    @Test
    fun defaultsPointAtTheAdbPushFolder() {
        assertEquals("/data/local/tmp/dijiang/model.pte", DemoConfig.DEFAULT.modelPath)
        assertEquals("/data/local/tmp/dijiang/manifest.json", DemoConfig.DEFAULT.manifestPath)
        assertEquals(0f, DemoConfig.DEFAULT.temperature, 0f)
    }
}
