package org.dijiang.demo.core

import org.junit.Assert.assertEquals
import org.junit.Assert.assertNull
import org.junit.Test

class StateSizeTest {
    private fun stateList(layers: Int) = (0 until layers).joinToString(",") {
        "{\"name\": \"state_$it\", \"shape\": [1, 9, 64, 64], \"dtype\": \"float32\"}"
    }

    // SmolLM2-135M: 30 layers, 9 heads, head size 64 -> 30 x 9 x 64 x 64 x 4 bytes.
    private val manifest = """
        {"state_shape": [1, 9, 64, 64], "model": {"n_layers": 30},
         "files": [
          {"format": "onnx", "quant": "fp32", "path": "model.onnx"},
          {"format": "pte", "quant": "int8", "path": "model_int8.pte", "state": [${stateList(30)}]},
          {"format": "pte", "quant": "fp32", "path": "model_fp32.pte", "state": [${stateList(2)}]}
         ]}
    """.trimIndent()

    @Test
    fun sumsTheStateTensorsOfTheNamedPte() {
        assertEquals(StateSize(30L * 9 * 64 * 64 * 4, 30), StateSize.fromManifest(manifest, "model_int8.pte", null))
        assertEquals(StateSize(2L * 9 * 64 * 64 * 4, 2), StateSize.fromManifest(manifest, "model_fp32.pte", null))
    }

    @Test
    fun aRenamedPteFallsBackToTheFirstPteEntry() {
        assertEquals(30, StateSize.fromManifest(manifest, "model.pte", null)!!.tensors)
    }

    @Test
    fun withoutPerFileStatesUsesTheLayerShapeTimesTheLayers() {
        val bare = "{\"state_shape\": [1, 9, 64, 64], \"model\": {\"n_layers\": 30}, \"files\": []}"
        assertEquals(StateSize(30L * 9 * 64 * 64 * 4, 30), StateSize.fromManifest(bare, "model.pte", null))
        assertEquals(StateSize(2L * 9 * 64 * 64 * 4, 2), StateSize.fromManifest(bare, "model.pte", 2))
    }

    @Test
    fun unknownWhenTheManifestHasNoShapes() {
        assertNull(StateSize.fromManifest("{\"files\": []}", "model.pte", 30))
    }

    @Test
    fun describesInDecimalMegabytes() {
        assertEquals("4.42 MB in 30 tensors", StateSize(4_423_680, 30).describe())
    }
}
