package org.dijiang.demo.core

import org.junit.Assert.assertEquals
import org.junit.Assert.assertNull
import org.junit.Test

class RunnerStatsTest {
    // The shape of extension/llm/runner/stats.h stats_to_json_string.
    private val json = "{\"prefill_token_per_sec\":400,\"decode_token_per_sec\":25,\"prompt_tokens\":40," +
        "\"generated_tokens\":50,\"model_load_start_ms\":1000,\"model_load_end_ms\":1500," +
        "\"inference_start_ms\":2000,\"inference_end_ms\":4100,\"model_execution_start_ms\":0," +
        "\"model_execution_end_ms\":0,\"prompt_eval_end_ms\":2100,\"first_token_ms\":2100," +
        "\"aggregate_sampling_time_ms\":12,\"SCALING_FACTOR_UNITS_PER_SECOND\":1000}"

    @Test
    fun parsesTheCallbackJson() {
        val s = RunnerStats.parse(json)!!
        assertEquals(40L, s.promptTokens)
        assertEquals(50L, s.generatedTokens)
        assertEquals(90L, s.positionsFed)
        assertEquals(25.0, s.decodeTokensPerSecond!!, 1e-9)
        assertEquals(400.0, s.prefillTokensPerSecond!!, 1e-9)
        assertEquals(100L, s.timeToFirstTokenMs)
        assertEquals(500L, s.modelLoadEndMs - s.modelLoadStartMs)
    }

    @Test
    fun parsesTheRunnerStdoutLine() {
        val out = "Hello there\nPyTorchObserver $json\n"
        assertEquals(RunnerStats.parse(json), RunnerStats.lastInOutput(out))
        assertEquals(RunnerStats.parse(json), RunnerStats.parse("PyTorchObserver $json"))
    }

    @Test
    fun lastInOutputTakesTheLatestTurn() {
        val later = json.replace("\"generated_tokens\":50", "\"generated_tokens\":7")
        val out = "PyTorchObserver $json\nreply text\nPyTorchObserver $later\n"
        assertEquals(7L, RunnerStats.lastInOutput(out)!!.generatedTokens)
    }

    @Test
    fun ratesAreNullWithoutElapsedTime() {
        val s = RunnerStats(3, 0, 10, 10, 10, 10)
        assertNull(s.decodeTokensPerSecond)
        assertNull(s.prefillTokensPerSecond)
    }

    @Test
    fun nonStatsTextGivesNull() {
        assertNull(RunnerStats.parse("I 00:00:01.000 executorch: Reached to the end of generation"))
        assertNull(RunnerStats.parse("{\"prompt_tokens\":1}"))
        assertNull(RunnerStats.parse("{broken"))
        assertNull(RunnerStats.lastInOutput("no stats here\n"))
    }
}
