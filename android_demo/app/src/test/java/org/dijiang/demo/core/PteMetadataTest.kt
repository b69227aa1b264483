package org.dijiang.demo.core

import org.junit.Assert.assertEquals
import org.junit.Assert.assertFalse
import org.junit.Assert.assertNull
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Test

class PteMetadataTest {
    /** The constant methods of a dijiang-edge SmolLM2 export (DESIGN.md section 3). */
    private val dijiang = mapOf(
        "get_max_seq_len" to listOf(256L),
        "get_max_context_len" to listOf(1L shl 20),
        "get_bos_id" to listOf(1L),
        "get_eos_ids" to listOf(2L, 0L),
        "get_vocab_size" to listOf(49152L),
        "get_n_layers" to listOf(30L),
        "use_kv_cache" to listOf(1L),
        "enable_dynamic_shape" to listOf(1L))

    @Test
    fun readsEveryConstantMethod() {
        val m = PteMetadata.read { dijiang[it] }
        assertEquals(256L, m.maxSeqLen)
        assertEquals(1L shl 20, m.maxContextLen)
        assertEquals(1L, m.bosId)
        assertEquals(listOf(2L, 0L), m.eosIds)
        assertEquals(49152L, m.vocabSize)
        assertEquals(30L, m.nLayers)
        assertTrue(m.useKvCache)
        assertTrue(m.enableDynamicShape)
        assertNull(m.problem())
    }

    @Test
    fun missingMethodsTakeTheRunnersDefaults() {
        val m = PteMetadata.read { if (it == "get_max_seq_len") listOf(128L) else null }
        assertEquals(128L, m.maxContextLen) // the runner uses max_seq_len
        assertTrue(m.useKvCache)
        assertFalse(m.enableDynamicShape)
        assertNull(m.bosId)
        assertEquals("get_eos_ids is empty: replies would never stop on their own", m.problem())
    }

    @Test
    fun aProgramWithoutMaxSeqLenIsNotAnLlm() {
        try {
            PteMetadata.read { null }
            fail("a .pte without get_max_seq_len must be refused")
        } catch (e: IllegalArgumentException) {
            assertTrue(e.message!!.contains("get_max_seq_len"))
        }
    }

    @Test
    fun withoutKvCacheTheRunnerWouldRefeedTheState() {
        val m = PteMetadata.read { if (it == "use_kv_cache") listOf(0L) else dijiang[it] }
        assertTrue(m.problem()!!.startsWith("use_kv_cache is false"))
    }
}
